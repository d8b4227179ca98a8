"""Where a checkpoint comes from: a local folder, or a Hugging Face Hub id downloaded once.

Its own file because it is its own concern: the network, tokens, resuming a cut download and
telling a mistyped folder from a hub id have nothing to do with what the model computes.
model.py loads a folder and never reaches the network; the scripts turn --model_path into a
folder here first.

    path = resolve_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct")  # checkpoints/HuggingFaceTB/...
    model = Transformer.from_pretrained(path)

HF_ENDPOINT changes the server (a mirror), HF_TOKEN is sent for private and gated models.
"""
import http.client
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from common import CheckpointError, InputError
from model import Config
from weights import weight_files

# The model every script uses when no --model_path is given: small enough to train on a CPU.
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROOT = "checkpoints"  # hub ids are downloaded to ROOT/org/name, relative to the working directory
HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def is_hub_id(path):
    """"org/name" that is not a local folder or file: a hub id (a mistyped folder looks the same)."""
    p = Path(path)
    return not p.exists() and len(p.parts) == 2 and not str(path).startswith((".", "/", "~"))


def resolve_checkpoint(path, root=ROOT):
    """A local folder as is; a hub id "org/name" becomes root/org/name, downloaded on first use
    (files are written under a .part name and renamed when complete, so an interrupted download
    is resumed, never mistaken for a complete one)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CheckpointError(f"{p}: no config.json (not a Hugging Face checkpoint folder)")
        return p
    if not is_hub_id(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    local = Path(root) / p
    if not (local / "config.json").exists() or not _weights_complete(local):
        download(str(path), local)
    return local


def same_checkpoint(a, b, root=ROOT):
    """Whether two --model_path values name the same folder; a hub id stands for root/org/name,
    where resolve_checkpoint puts it (nothing is downloaded)."""
    def where(path):  # realpath, unlike Path.resolve, never raises (on a symlink loop, say)
        return os.path.realpath(Path(root) / path if is_hub_id(path) else path)
    return where(a) == where(b)


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def file_url(repo_id, name):
    return f"{endpoint()}/{repo_id}/resolve/main/{name}"


def open_hub_file(repo_id, name):
    """The response for one file of a hub model, from endpoint(), with HF_TOKEN sent when it is set
    (urllib's errors are the caller's to word)."""
    req = urllib.request.Request(file_url(repo_id, name))
    if token := os.environ.get("HF_TOKEN"):
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=30)


def read_config(model_path, root=ROOT):
    """config.json of a checkpoint folder, of a hub id already downloaded, or fetched alone from
    the hub (into memory: nothing is written), for --estimate_memory, which needs nothing else."""
    for folder in (Path(model_path), Path(root) / model_path):
        if (folder / "config.json").is_file():
            return Config.from_json(folder / "config.json")
    try:
        with open_hub_file(model_path, "config.json") as r:
            return Config.from_dict(json.loads(r.read()))
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
        raise InputError(f"{model_path}: no config.json here, nor from {endpoint()} ({e})") from None


def _weights_complete(local):
    try:
        return all((local / f).exists() for f in set(weight_files(local).values()))
    except CheckpointError:
        return False


def download(repo_id, local):
    token = os.environ.get("HF_TOKEN")

    def fetch(name, required=True):
        if (local / name).exists():
            return True
        from tqdm import tqdm
        url = file_url(repo_id, name)
        try:
            with open_hub_file(repo_id, name) as r:
                local.mkdir(parents=True, exist_ok=True)  # only once a file comes: a wrong id leaves no folder
                total = int(r.headers.get("Content-Length") or 0) or None
                part = local / (name + ".part")
                with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                if total is not None and part.stat().st_size != total:
                    raise CheckpointError(f"{url}: download ended early ({part.stat().st_size} of {total} bytes)")
                os.replace(part, local / name)
                return True
        except urllib.error.HTTPError as e:
            if e.code == 404 and not required:
                return False
            # The Hub answers a model that does not exist as it answers a private one (401
            # without a token, 404 with one): on the first file, that is most often a typo.
            # (EntryNotFound: the model is there, without this file, e.g. a GGUF-only one.)
            if name == HUB_FILES[0] and e.code in (401, 403, 404) and e.headers.get("X-Error-Code") != "EntryNotFound":
                hint = "gated? accept its terms on its Hub page" if token else "private or gated? set HF_TOKEN"
                raise CheckpointError(f"{repo_id}: no such folder, and no such model on the Hub ({hint})") from None
            hint = " (gated or private: set HF_TOKEN)" if e.code in (401, 403) else ""
            raise CheckpointError(f"{url}: HTTP {e.code}{hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            why = getattr(e, "reason", e)
            raise CheckpointError(f"cannot download {repo_id} from {endpoint()} (offline? {why!r}); "
                                  f"put the checkpoint folder at {local} or pass --model_path DIR") from None

    for name in HUB_FILES:
        fetch(name, required=name in ("config.json", "tokenizer.json"))
    if fetch("model.safetensors.index.json", required=False):
        for shard in sorted(set(weight_files(local).values())):
            fetch(shard)
    else:
        fetch("model.safetensors")
