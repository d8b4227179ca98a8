"""Shared fixtures, and the rule that nothing hides: under CI=true a skipped test fails.

Tests that need the real model use the `smollm2` fixture; everything else runs on tiny models and
tokenizers made by tests/helpers.py. Tests marked `cuda` need a GPU and are the only ones allowed to skip in CI:
`python -m pytest -m cuda tests` runs just them.
"""
import pytest
import torch

from helpers import SMOLLM2, SMOLLM2_TOKENIZER, hf_checkpoint, in_ci, make_tiny_checkpoint, write_chatml_tokenizer


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "cuda: needs a CUDA GPU; skipped without one (run them: python -m pytest -m cuda tests)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # In CI every test runs: a skip (missing checkpoint, missing comparison package) is a failure,
    # except for the GPU tests, which a CPU runner cannot run.
    report = yield
    if report.skipped and in_ci() and not hasattr(report, "wasxfail") and item.get_closest_marker("cuda") is None:
        fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    # the same for a whole module skipped while collected (a module-level importorskip)
    report = yield
    if report.skipped and in_ci():
        fail_skip(report)
    return report


def fail_skip(report):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr  # (file, line, reason)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where only tests marked cuda may skip: {reason}"


@pytest.fixture
def smollm2():
    """Path of the real SmolLM2-135M-Instruct checkpoint; skips the test when it is absent."""
    if not (SMOLLM2 / "model.safetensors").exists():
        # any command with the default model downloads it from the Hugging Face Hub into SMOLLM2
        pytest.skip(f"needs the real model at {SMOLLM2}; download it once (270 MB) from the repository root "
                    "with: python generate.py --prompt Hi --max_new_tokens 1")
    return SMOLLM2


@pytest.fixture
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer files (tests/data/smollm2): its real vocabulary and chat
    template, without the weights, so the tests that need only those run without the model."""
    return SMOLLM2_TOKENIZER


@pytest.fixture
def chatml_tokenizer(tmp_path):
    """A folder with SmolLM2's tokenizer pipeline, specials and tokenizer_config.json (a small vocabulary)."""
    return write_chatml_tokenizer(tmp_path / "chatml")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny model saved as a Hugging Face folder, with a ChatML word-level tokenizer."""
    return make_tiny_checkpoint(tmp_path / "tiny")


@pytest.fixture
def hf_base(tmp_path):
    """A checkpoint folder written by transformers, for comparisons with PEFT (load it there with
    helpers.load_hf): a tiny random Llama shaped like SmolLM2 (tied embeddings, GQA 9/3 heads of 8,
    norms not 1), helpers.hf_checkpoint's. The interop is exact on it as on the real model."""
    pytest.importorskip("peft", reason="peft is needed to compare with PEFT")
    pytest.importorskip("transformers", reason="transformers is needed to compare with PEFT")
    return hf_checkpoint(tmp_path / "hf_base")[1]
