"""What a training run lets you see: answers to a few prompts before, during and after training,
a loss curve, and the same records on Weights & Biases if you want them there.

    python train.py --eval_prompts data/brannock_eval_prompts.jsonl   # samples.jsonl, before/after table
    python observe.py out/lora                       # redraw out/lora/loss.svg from metrics.jsonl
    python observe.py out/r4 out/r16 -o sweep.svg    # several runs on one chart, last losses side by side

Its own file because none of it changes what is learned: train.py calls an `Observer` at four
points (start, log, sample, finish) and stays a training loop. Everything here is rank 0's job.

An eval prompt file is JSONL, one {"prompt": ..., "expected": ...} per line ("expected" optional).
Answers are greedy, so the same adapter always gives the same answer; one counts as right when it
contains the expected text, ignoring case, so write "expected" as the fact to find ("Saltmere"),
not as a whole sentence. A prompt may carry "tools" (JSON schemas, as in the training data);
"expected" may then be a tool's name: right when the answer calls it with a JSON object as
arguments (tokenizer.parse_tool_calls). samples.jsonl gets one line per prompt and evaluation; step 0 is the
base model (a fresh adapter changes nothing).

loss.svg is drawn by hand (an SVG file is text: lines, circles and labels), so plotting needs
no dependency; any browser shows it, and it is redrawn while the run goes.
"""
import argparse
import html
import json
import math
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

from adapters import disable_adapters
from common import InputError, written_atomically
import data
from generate import generate
from tokenizer import parse_tool_calls

MAX_NEW_TOKENS = 64  # per sampled answer: enough for a sentence, and shows a model that never stops
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


# --- eval prompts and answers ----------------------------------------------------------------

def read_prompts(path, tokenizer=None):
    """[{"prompt": str, "expected": str or None, "tools": list or None}] from a JSONL file; bad
    lines name file:line, as do tools the tokenizer's chat template has no place for."""
    prompts = []
    for n, record in data.read_jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise data.DataError(f'{where}: expected {{"prompt": "...", "expected": "..."}} with a non-empty prompt')
        expected = record.get("expected")
        if expected is not None and (not isinstance(expected, str) or not expected.strip()):
            raise data.DataError(f"{where}: expected must be a non-empty string (or left out)")
        if unknown := sorted(set(record) - {"prompt", "expected", "tools"}):
            raise data.DataError(f"{where}: unknown key {unknown[0]!r} (only prompt, expected and tools)")
        tools = data.check_tools(record.get("tools"), where)
        prompts.append({"prompt": record["prompt"], "expected": expected, "tools": tools})
        if prompts[-1]["tools"] and tokenizer is not None and tokenizer.template is not None:
            try:
                prompt_ids(tokenizer, record["prompt"], prompts[-1]["tools"])
            except ValueError as e:
                raise data.DataError(f"{where}: {e}") from None
    return prompts


def prompt_ids(tokenizer, prompt, tools=None):
    """A user turn (after the tools' schemas) in the checkpoint's chat template, ready for the
    reply; raw text if it has none."""
    if tokenizer.template is None:
        return tokenizer.encode(prompt)
    text, _ = tokenizer.render([{"role": "user", "content": prompt}], add_generation_prompt=True, tools=tools)
    return tokenizer.encode(text, bos=False)


def answer(model, tokenizer, prompt, max_new_tokens=MAX_NEW_TOKENS, tools=None):
    """The model's greedy reply to one prompt, without its end-of-turn token."""
    ids = prompt_ids(tokenizer, prompt, tools)
    tokens = [t for t in generate(model, ids, max_new_tokens, eos_ids=tokenizer.eos_ids) if t not in tokenizer.eos_ids]
    return tokenizer.decode(tokens).strip()


def answers(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS):
    """Greedy replies to every prompt, in eval mode (no dropout); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return [answer(model, tokenizer, p["prompt"], max_new_tokens, p.get("tools")) for p in prompts]
    finally:
        model.train(was_training)


def is_right(reply, expected, tools=None):
    """The reply contains the expected text; or, when expected names one of the prompt's tools,
    calls that tool with a JSON object as its arguments."""
    if expected is not None and expected in {t["function"]["name"] for t in tools or []}:
        return any(c.get("name") == expected and isinstance(c.get("arguments"), dict) for c in parse_tool_calls(reply))
    return expected is not None and expected.lower() in reply.lower()


def count_right(prompts, replies):
    """(right, checkable): how many replies are right, of those with an expected answer."""
    checkable = [(p, r) for p, r in zip(prompts, replies) if p["expected"] is not None]
    return sum(is_right(r, p["expected"], p.get("tools")) for p, r in checkable), len(checkable)


def sample_records(step, prompts, replies):
    return [{"step": step, "prompt": p["prompt"], "answer": r, "expected": p["expected"],
             **({"right": is_right(r, p["expected"], p.get("tools"))} if p["expected"] is not None else {})}
            for p, r in zip(prompts, replies)]


def table(prompts, before, after, width=112, max_lines=4):
    """A plain-text table, one row per prompt: prompt | expected | base model | fine-tuned, each
    answer marked [right] or [wrong] when there is an expected text. Cells wrap; long answers are
    cut after max_lines lines, their mark with them (samples.jsonl has them whole)."""
    has_expected = any(p["expected"] is not None for p in prompts)
    mark = lambda r, p: r + (" [right]" if is_right(r, p["expected"], p.get("tools")) else " [wrong]") \
        if p["expected"] is not None else r
    rows = [[p["prompt"], *([p["expected"] or ""] if has_expected else []), mark(b, p), mark(a, p)]
            for p, b, a in zip(prompts, before, after)]
    head = ["prompt", *(["expected"] if has_expected else []), "base model", "fine-tuned"]
    # the prompt and expected columns as wide as their text (up to a cap); answers share the rest
    widths = [min(28, max(6, *(len(r[0]) for r in rows)))]
    if has_expected:
        widths.append(min(14, max(8, *(len(r[1]) for r in rows))))
    rest = max(20, (width - sum(widths) - 3 * len(head) - 1) // 2)
    widths += [rest, rest]

    def line(cells):
        wrapped = []
        for c, w in zip(cells, widths):
            lines = textwrap.wrap(c, w) or [""]
            if len(lines) > max_lines:
                rest = textwrap.shorten(" ".join(lines[max_lines - 1:]), w, placeholder=" ...")
                lines = lines[:max_lines - 1] + [rest]
            wrapped.append(lines)
        cell = lambda col, i, w: col[i].ljust(w) if i < len(col) else " " * w
        return ["| " + " | ".join(cell(col, i, w) for col, w in zip(wrapped, widths)) + " |"
                for i in range(max(map(len, wrapped)))]

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([*line(head), rule, *(l for r in rows for l in line(r))])


# --- the loss curve, drawn by hand -------------------------------------------------------------

def moving_average(ys, k):
    """Mean of the last k values at each point (fewer at the start): a noisy train loss becomes
    a readable trend, without the lag of a long window."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def smoothing_window(n):
    """About sqrt(n) steps: 3 for a 10-step run, 6 for 35, 32 for 1000."""
    return max(1, round(math.sqrt(n)))


def nice_ticks(lo, hi, n=6):
    """Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi] in about n steps."""
    if hi <= lo:
        hi = lo + 1
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    first = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(count + 1)]


def svg_chart(series, title, xlabel, ylabel, width=720, height=420):
    """An SVG line chart. series: [{"label", "points": [(x, y)], "color", and optional "faint"
    (thin and pale), "dots" (a circle at each point)}]. y starts at 0."""
    pts = [p for s in series for p in s["points"]]
    if not pts:
        pts = [(0, 0), (1, 1)]
    xt = nice_ticks(min(0, *(x for x, _ in pts)), max(x for x, _ in pts))
    yt = nice_ticks(0, max(y for _, y in pts))
    left, right, top, bottom = 64, 16, 36, 52  # margins for tick labels, title and axis labels
    X = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0]) * (width - left - right)
    Y = lambda y: height - bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (height - top - bottom)
    fmt = lambda v: f"{v:g}"
    e = html.escape
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{e(title)}</text>']
    for x in xt:  # vertical grid lines and x tick labels
        svg.append(f'<line x1="{X(x):.1f}" y1="{top}" x2="{X(x):.1f}" y2="{height - bottom}" stroke="#e5e5e5"/>')
        svg.append(f'<text x="{X(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{fmt(x)}</text>')
    for y in yt:
        svg.append(f'<line x1="{left}" y1="{Y(y):.1f}" x2="{width - right}" y2="{Y(y):.1f}" stroke="#e5e5e5"/>')
        svg.append(f'<text x="{left - 6}" y="{Y(y) + 4:.1f}" text-anchor="end">{fmt(y)}</text>')
    svg.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
               'fill="none" stroke="#888"/>')
    svg.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{e(xlabel)}</text>')
    svg.append(f'<text transform="translate(16 {(top + height - bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">{e(ylabel)}</text>')
    for s in series:
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s["points"])
        style = 'stroke-width="1" stroke-opacity="0.35"' if s.get("faint") else 'stroke-width="2"'
        svg.append(f'<polyline points="{path}" fill="none" stroke="{s["color"]}" {style}/>')
        if s.get("dots"):
            svg += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{s["color"]}"/>' for x, y in s["points"]]
    # the legend on a white box, a line (and a dot) per series: top right, or bottom left if
    # fewer points fall there (a loss falls from top left to bottom right, but not always)
    box_w, box_h = 40 + 6.6 * max((len(s["label"]) for s in series), default=0), 16 * len(series) + 8
    corners = [(width - right - box_w - 8, top + 8), (left + 8, height - bottom - box_h - 8)]
    inside = lambda x0, y0: sum(x0 <= X(x) <= x0 + box_w and y0 <= Y(y) <= y0 + box_h for x, y in pts)
    x0, y0 = min(corners, key=lambda c: inside(*c))
    svg.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{box_w:.1f}" height="{box_h}" '
               'fill="white" fill-opacity="0.85" stroke="#ccc"/>')
    for i, s in enumerate(series):
        y = y0 + 16 + 16 * i
        style = 'stroke-width="1" stroke-opacity="0.35"' if s.get("faint") else 'stroke-width="2"'
        svg.append(f'<line x1="{x0 + 8:.1f}" y1="{y - 4:.1f}" x2="{x0 + 30:.1f}" y2="{y - 4:.1f}" '
                   f'stroke="{s["color"]}" {style}/>')
        if s.get("dots"):
            svg.append(f'<circle cx="{x0 + 19:.1f}" cy="{y - 4:.1f}" r="3" fill="{s["color"]}"/>')
        svg.append(f'<text x="{x0 + 36:.1f}" y="{y:.1f}">{e(s["label"])}</text>')
    return "\n".join(svg + ["</svg>"]) + "\n"


def read_metrics(out):
    path = Path(out) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def loss_series(records, color=COLORS[0], eval_color=COLORS[1], label=""):
    """Chart series for one run: raw train loss (faint), its moving average, eval loss (dots)."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    k = smoothing_window(len(train))
    smooth = list(zip([x for x, _ in train], moving_average([y for _, y in train], k)))
    series = [{"label": f"{label}train, each step", "points": train, "color": color, "faint": True},
              {"label": f"{label}train (mean of last {k} steps)", "points": smooth, "color": color}]
    if evals:
        series.append({"label": f"{label}eval", "points": evals, "color": eval_color, "dots": True})
    return series


def loss_svg(records, title):
    return svg_chart(loss_series(records), title, "step", "loss (nats per learned token)")


def write_atomic(path, text):
    """A reader (a browser refreshing loss.svg) never sees half a file."""
    with written_atomically(path) as tmp:
        tmp.write_text(text)


def cut_back(path, step):
    """Keep the records of JSONL file `path`, if there is one, up to step `step`: what a run resumed
    at `step` had written (metrics.jsonl, samples.jsonl)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in kept))


def compare_svg(runs):
    """Several runs on one chart: {name: records} -> SVG, each run its own colour (the smoothed
    train loss and the eval loss; the raw train loss would hide the differences)."""
    series = []
    for i, (name, records) in enumerate(runs.items()):
        color = COLORS[i % len(COLORS)]
        series += [s for s in loss_series(records, color, color, label=f"{name} ") if not s.get("faint")]
    return svg_chart(series, "train loss (line) and eval loss (dots)", "step", "loss (nats per learned token)")


def summary(name, records):
    """One line: the last smoothed train loss and the last eval loss of a run."""
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    smooth = moving_average(train, smoothing_window(len(train)))[-1] if train else float("nan")
    last_eval = f"{evals[-1]:.4f}" if evals else "-"
    return f"{name:<24} {len(train):>5} {smooth:>11.4f} {last_eval:>9}"


# --- Weights & Biases (optional) -------------------------------------------------------------

def import_wandb():
    try:
        import wandb
    except ImportError:
        raise InputError("--wandb_project needs the wandb package: pip install wandb") from None
    return wandb


# --- the hooks train.py calls ------------------------------------------------------------------

class Observer:
    """Everything a run shows besides metrics.jsonl: samples.jsonl and the before/after table
    (with eval_prompts), loss.svg, and Weights & Biases (with wandb_project). On ranks other than
    0 every method does nothing, but the prompt file is read on all ranks, so that a bad file
    stops them all the same way."""

    def __init__(self, cfg, out, tokenizer, rank=0):
        self.cfg, self.out, self.tokenizer, self.active = cfg, Path(out), tokenizer, rank == 0
        self.prompts = read_prompts(cfg.eval_prompts, tokenizer) if cfg.eval_prompts else []
        if cfg.wandb_project:
            import_wandb()  # on every rank: a missing package stops them all, before anything is loaded
        self.wandb, self.records, self.before, self.last = None, [], None, None

    def start(self, model, step):
        """Once output_dir exists: wandb's run (with the config), the records of a resumed run so
        far (for the curve), and the base model's answers (adapters off), as step 0 of samples.jsonl."""
        if not self.active:
            return
        if self.cfg.wandb_project:
            self.wandb = import_wandb().init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name,
                                             config=asdict(self.cfg), dir=self.out)
        self.records = [r for r in read_metrics(self.out) if r["step"] <= step]
        if not self.prompts:
            return
        with disable_adapters(model):
            self.before = answers(model, self.tokenizer, self.prompts)
        path = self.out / "samples.jsonl"
        if step == 0:  # the base model's answers, as step 0
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in sample_records(0, self.prompts, self.before)))
        else:
            cut_back(path, step)

    def log(self, record):
        """A metrics.jsonl record: to wandb, and into loss.svg (redrawn every 10 steps and at evals)."""
        if not self.active:
            return
        self.records.append(record)
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if record["step"] % 10 == 0 or "eval_loss" in record:
            self.draw()

    def draw(self):
        write_atomic(self.out / "loss.svg", loss_svg(self.records, f"{self.cfg.output_dir}: {self.cfg.model_path}"))

    def sample(self, model, step):
        """Answers to the eval prompts now, appended to samples.jsonl; {"eval_right": n} to log
        with the step's metrics when the prompts have expected answers."""
        if not (self.active and self.prompts):
            return {}
        replies = answers(model, self.tokenizer, self.prompts)
        with open(self.out / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in sample_records(step, self.prompts, replies))
        self.last = replies
        right, checkable = count_right(self.prompts, replies)
        return {"eval_right": right} if checkable else {}

    def finish(self, step):
        """The end of a run: the curve drawn, the before/after table printed, wandb closed.
        Call it after a last sample(), whose answers are the "fine-tuned" column."""
        if not self.active:
            return
        self.draw()
        if self.prompts:
            print(f"\nbefore/after on {self.cfg.eval_prompts} (greedy, at most {MAX_NEW_TOKENS} new tokens; all in "
                  f"{self.out / 'samples.jsonl'}):\n" + table(self.prompts, self.before, self.last))
            right_before, checkable = count_right(self.prompts, self.before)
            right_after, _ = count_right(self.prompts, self.last)
            if checkable:
                print(f"right: base model {right_before}/{checkable}, "
                      f"fine-tuned (step {step}) {right_after}/{checkable}")
        if self.wandb:
            if self.prompts:
                columns = ["prompt", "expected", "base model", "fine-tuned"]
                rows = [[p["prompt"], p["expected"], b, a] for p, b, a in zip(self.prompts, self.before, self.last)]
                self.wandb.log({"before_after": import_wandb().Table(columns=columns, data=rows)}, step=step)
            self.wandb.finish()
        print(f"loss curve: {self.out / 'loss.svg'}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw loss.svg of a run from its metrics.jsonl, "
                                            "or compare runs on one chart.")
    p.add_argument("runs", nargs="+", help="output_dir of a run (holding metrics.jsonl)")
    p.add_argument("-o", "--output", help="with several runs, the chart to write (default: compare.svg)")
    args = p.parse_args(argv)
    runs = {}
    for run in args.runs:
        if not (records := read_metrics(run)):
            print(f"observe.py: error: {Path(run) / 'metrics.jsonl'}: no such file, or empty", file=sys.stderr)
            sys.exit(2)
        runs[Path(run).name if len(args.runs) > 1 else run] = records
    print(f"{'run':<24} {'steps':>5} {'train loss':>11} {'eval loss':>9}   (train: mean of the last sqrt(steps) steps)")
    for name, records in runs.items():
        print(summary(name, records))
    if len(runs) == 1 and not args.output:
        write_atomic(Path(args.runs[0]) / "loss.svg", loss_svg(runs[args.runs[0]], args.runs[0]))
        print(f"wrote {Path(args.runs[0]) / 'loss.svg'}")
    else:
        write_atomic(args.output or "compare.svg", compare_svg(runs))
        print(f"wrote {args.output or 'compare.svg'}")


if __name__ == "__main__":
    main()
