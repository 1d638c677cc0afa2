"""Prefix reuse and chunked prefill on the 2B shapes (random weights, 4 decoder layers, the full vision encoder,
float32): the figures behind BENCHMARKS.md's "Prefix reuse and chunked prefill" section.

    python bench/reuse_and_chunks.py --workdir /tmp/mindvl-reuse-bench

(a) A three-turn chat about a 448x448 image, each turn resending the whole history with the previous answers:
    time to first token of turns 2 and 3 against turn 1 (target ≤ 0.1 ×) and against transformers, which runs the
    whole history (image included) again every turn. Each repeat is a fresh conversation on a runtime with empty
    caches over the loaded graphs, so its turn 1 is cold.
(b) A text prompt of 4 × the largest prefill bucket, for two chunk sizes: 4 × 128 tokens in a 1024-slot cache and
    4 × 512 tokens in a 4096-slot cache, each against one call of a bucket that holds the prompt whole (same cache):
    prefill time per prompt token (target: chunked ≤ 1.1 × whole).

Runtime TTFT is preprocess + vision + prefill, as `mindvl bench` counts it; transformers' is the wall time of
preprocess + `generate(max_new_tokens=1)` in its own process (`mindvl.bench.worker`). After a warm-up of each, the
measurements interleave (runtime and transformers turn by turn; the two artifacts call by call, alternating which
goes first) and the figures are medians over the repeats.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from statistics import median

from mindvl.bench.benchmark import FILLER, Worker, bench_model, export_once, log, machine, script_args

QUESTIONS = ("Describe this image in detail.", "Which colours dominate, and where are they?",
             "Suggest a title for it.")
ANSWER_TOKENS = 32  # each turn's answer, resent in the next turn's history
# The chat's artifact, which also holds each long prompt of (b) whole; then per chunk size an artifact whose largest
# prefill bucket is that chunk, with the cache the whole prompt takes.
WHOLE = {"images": ["448x448"], "batch": [1], "prefill": [128, 512, 2048], "cache": [1024, 4096], "dtype": "float32"}
TEXT_ONLY = {k: v for k, v in WHOLE.items() if k != "images"}
CHUNKED = {128: {**TEXT_ONLY, "prefill": [128], "cache": [1024]}, 512: {**TEXT_ONLY, "prefill": [512], "cache": [4096]}}


def ttft_ms(out) -> float:
    t = out.timings
    return t["preprocess"] + t["vision"] + t["prefill"]


def chat(runtime, image: str, transformers: Worker | None) -> list[dict]:
    """One three-turn conversation on a runtime with empty caches: per turn the runtime's figures and, asked right
    after on the same history, transformers'."""
    from mindvl.runtime import Runtime

    fresh = Runtime(runtime.artifacts, runtime.device)  # new caches over the loaded graphs: turn 1 is cold
    history, turns = [], []
    for turn, question in enumerate(QUESTIONS):
        history.append({"role": "user", "content": [{"type": "image"}] * (turn == 0) + [{"type": "text",
                                                                                        "text": question}]})
        out = fresh.chat(history, [image], max_new_tokens=ANSWER_TOKENS)
        turns.append({"prompt_tokens": out.prompt_tokens, "reused": out.prompt_tokens_reused,
                      "prefilled": out.prompt_tokens_prefilled, "prefill_chunks": out.prefill_chunks,
                      "vision_graphs": len(out.buckets["vision"]), "ttft_ms": ttft_ms(out),
                      "vision_ms": out.timings["vision"], "prefill_ms": out.timings["prefill"]})
        if transformers is not None:
            theirs = transformers.ask(json.dumps({"messages": history, "new_tokens": 1}))
            turns[-1].update(transformers_ttft_ms=theirs["ttft_ms"], transformers_vision_ms=theirs["vision_ms"])
        history.append({"role": "assistant", "content": out.text})
    return turns


def exact_prompt(runtime, tokens: int) -> str:
    """A question whose prompt (chat template included) is exactly `tokens` tokens."""
    words, text = FILLER.split(), ""
    while runtime.processor.prepare(text + " " + words[0]).input_ids.shape[1] <= tokens:
        text, words = text + " " + words[0], words[1:] + words[:1]
    for filler in ".,;:!?-x":  # one more character, until one makes a token of its own
        while runtime.processor.prepare(text + filler).input_ids.shape[1] <= tokens:
            text += filler
        if runtime.processor.prepare(text).input_ids.shape[1] == tokens:
            return text
    raise RuntimeError(f"no prompt of exactly {tokens} tokens found")


def prefill_per_token(runtimes: dict, prompt: str, repeats: int) -> dict[str, list[dict]]:
    """Each runtime's prefill of `prompt` (one new token, no decode step), `repeats` times each, alternating which
    goes first."""
    runs = {name: [] for name in runtimes}
    for r in range(repeats + 1):
        for name in list(runtimes)[:: 1 if r % 2 else -1]:
            out = runtimes[name].generate(prompt, max_new_tokens=1)
            assert out.prompt_tokens_reused == 0 and out.vision_cache_hits == 0  # the caches are off: every run cold
            if r:  # the first round is the warm-up
                runs[name].append({"prefill_ms": out.timings["prefill"], "prompt_tokens": out.prompt_tokens,
                                   "calls": out.prefill_chunks, "graph": out.buckets["prefill"]})
    return runs


def report_lines(report: dict) -> list[str]:
    """The markdown BENCHMARKS.md shows. Ratios are medians of each repeat's own ratio: the two sides of one ratio
    ran back to back, so a machine that slows down for a while moves both."""
    m, chats, runs = report["machine"], report["chat"], report["prefill"]
    lines = [f"Command: `{report['command']}` — {report['date']}, {m['cpu']}, {m['cores']} cores, "
             f"{m['memory_gib']:.0f} GiB, MindSpore {m['mindspore']}, torch {m['torch']}; medians of "
             f"{report['repeats']} interleaved repeats after a warm-up.", "",
             f"(a) A three-turn chat about a 448x448 image, answers of {ANSWER_TOKENS} tokens resent in the history:",
             "", "| turn | prompt tokens | reused / prefilled (calls) | vision graphs run | runtime TTFT ms | "
             "× turn 1 | transformers TTFT ms (whole history) | runtime / transformers |",
             "|---|---|---|---|---|---|---|---|"]
    for i in range(len(QUESTIONS)):
        t = {k: median(chat[i][k] for chat in chats) for k in chats[0][i]}
        versus = (f"{t['transformers_ttft_ms']:.0f} | "
                  f"{median(c[i]['ttft_ms'] / c[i]['transformers_ttft_ms'] for c in chats):.3f}")
        lines.append(f"| {i + 1} | {t['prompt_tokens']:.0f} | {t['reused']:.0f} / {t['prefilled']:.0f} "
                     f"({t['prefill_chunks']:.0f}) | {t['vision_graphs']:.0f} | {t['ttft_ms']:.0f} | "
                     f"{median(c[i]['ttft_ms'] / c[0]['ttft_ms'] for c in chats):.3f} | {versus} |")
    ratio = max(median(c[i]["ttft_ms"] / c[0]["ttft_ms"] for c in chats) for i in range(1, len(QUESTIONS)))
    lines += ["", f"- TTFT of turns 2 and 3 / turn 1: at most {ratio:.3f} (≤ 0.1) — "
                  f"**{'met' if ratio <= 0.1 else 'missed'}**", "",
              "(b) A text prompt of 4 × the largest prefill bucket of a chunked artifact, one new token, against an "
              "artifact with a bucket that holds it whole (same cache):", "",
              "| prompt tokens | cache | graph | calls | prefill ms | ms per prompt token | chunked / whole |",
              "|---|---|---|---|---|---|---|"]
    verdicts = []
    for chunk, pair in runs.items():
        ratio = median(c["prefill_ms"] / w["prefill_ms"] for c, w in zip(pair["chunked"], pair["whole"], strict=True))
        verdicts.append(f"{chunk}-token chunks {ratio:.3f} (**{'met' if ratio <= 1.1 else 'missed'}**)")
        for name, each in pair.items():
            cache = report["buckets"][chunk]["cache"][-1]
            lines.append(f"| {each[0]['prompt_tokens']} | {cache} | {each[0]['graph']} | {each[0]['calls']} | "
                         f"{median(r['prefill_ms'] for r in each):.0f} | "
                         f"{median(r['prefill_ms'] / r['prompt_tokens'] for r in each):.2f} | "
                         f"{f'{ratio:.3f}' if name == 'chunked' else ''} |")
    return lines + ["", "- chunked / whole, per prompt token (≤ 1.1): " + "; ".join(verdicts)]


def main() -> None:
    args = script_args(__doc__, "/tmp/mindvl-reuse-bench", 5, report_lines)

    from mindvl.runtime import Runtime

    work = Path(args.workdir)
    model, image = bench_model(work)
    artifacts = export_once(model, work / "whole-artifacts", WHOLE)
    chunked = {chunk: export_once(model, work / f"chunks-{chunk}-artifacts", spec) for chunk, spec in CHUNKED.items()}

    setup = work / "transformers" / "setup.json"
    setup.parent.mkdir(exist_ok=True)
    setup.write_text(json.dumps({"model": str(model), "images": [image], "prompt": QUESTIONS[0], "new_tokens": 1,
                                 "dtype": "float32", "buckets": WHOLE}))
    log("loading transformers (its own process) and the runtime")
    transformers = Worker("transformers", setup)
    try:
        runtime = Runtime.load(artifacts)
        chat(runtime, image, None)  # warm-up: every graph loaded, first-touch allocations made
        turns = []
        for r in range(args.repeats):
            turns.append(chat(runtime, image, transformers))
            log(f"  chat {r + 1}/{args.repeats}: TTFT ms " + ", ".join(
                f"{t['ttft_ms']:.0f} (transformers {t['transformers_ttft_ms']:.0f})" for t in turns[-1]))
    finally:
        transformers.close()

    whole = Runtime(runtime.artifacts, runtime.device, prefix_cache_mb=0, vision_cache_mb=0)
    prefill = {}
    for chunk, folder in chunked.items():
        runtimes = {"chunked": Runtime.load(folder, prefix_cache_mb=0, vision_cache_mb=0), "whole": whole}
        log(f"prefill of {4 * chunk} tokens: 4 chunks of {chunk} against one call")
        prefill[chunk] = prefill_per_token(runtimes, exact_prompt(whole, 4 * chunk), args.repeats)

    command = f"python bench/reuse_and_chunks.py --workdir {args.workdir} --repeats {args.repeats}"
    report = {"date": str(date.today()), "command": command, "repeats": args.repeats,
              "machine": machine(), "buckets": {"whole": WHOLE, **CHUNKED}, "chat": turns, "prefill": prefill}
    (work / "reuse_and_chunks.json").write_text(json.dumps(report, indent=1))
    print("\n".join(report_lines(report)))


if __name__ == "__main__":
    main()
