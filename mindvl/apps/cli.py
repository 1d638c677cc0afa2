"""The `mindvl` command line: argparse at the edge, typed functions underneath."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindvl",
                                     description="Qwen2-VL as graph-mode MindSpore MindIR at static shapes.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="export a model (default: a tiny random one), answer image and video prompts "
                                       "through the runtime, and compare latency with pynative")
    demo.add_argument("--model", help="a Hugging Face Qwen2-VL folder (default: a tiny random one, made locally)")
    demo.add_argument("-p", "--prompt", help="the user's text (default: the demo's own image and video prompts)")
    demo.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    demo.add_argument("--video", action="append", default=[], help="a video file; repeat for several")
    demo.add_argument("--preset", default="tiny", help="bucket preset the demo exports at (default: tiny)")
    demo.add_argument("--cache-dir", help="where the model and its artifacts go (default: the user cache folder)")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--device", choices=("CPU", "Ascend"), default=None)

    export = sub.add_parser("export", help="MindIR graphs at every bucket + one copy of the weights + manifest")
    export.add_argument("model_dir", help="Hugging Face Qwen2-VL folder (config.json, *.safetensors, tokenizer)")
    export.add_argument("-o", "--output", required=True, help="artifact folder to create")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--buckets", help="bucket spec YAML file")
    which.add_argument("--preset", help="a bucket preset shipped with mindvl (default: default)")
    export.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="overrides the spec's dtype")
    export.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    export.add_argument("--format", default="mindir",
                        help="graph formats, comma-separated: mindir (default), onnx (needs the onnx extra), or both")
    export.add_argument("--tp", type=int, help="tensor-parallel degree: the decoder split over N ranks, which "
                        "generate and serve launch through msrun (overrides the spec's tp; default 1)")

    inspect = sub.add_parser("inspect", help="what an artifact folder holds")
    inspect.add_argument("artifacts")
    inspect.add_argument("--verify", action="store_true", help="rehash every file and load every graph")

    generate = sub.add_parser("generate", help="answer a prompt with exported artifacts")
    generate.add_argument("artifacts")
    generate.add_argument("-p", "--prompt", required=True)
    generate.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    generate.add_argument("--video", action="append", default=[], help="a video file; repeat for several")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    generate.add_argument("--json", action="store_true", help="print one JSON object with ids, buckets, timings")
    generate.add_argument("--device", choices=("CPU", "Ascend"), default=None)
    generate.add_argument("--format", choices=("mindir", "onnx"),
                       help="which graphs to run when the artifact has both (default: mindir)")
    generate.add_argument("--provider", choices=("CPU", "CUDA"), default="CPU",
                       help="onnxruntime's execution provider for ONNX graphs (default: CPU)")
    bench = sub.add_parser("bench", help="runtime vs graph vs pynative vs transformers on one workload, "
                                         "against the memory roofline")
    bench.add_argument("target", metavar="MODEL_DIR_OR_ARTIFACTS")
    bench.add_argument("--modes", default="runtime,onnx,graph,pynative,transformers",
                       help="comma-separated subset of runtime (MindIR graphs), onnx (the same graphs as ONNX, run "
                            "by onnxruntime), graph, pynative, transformers")
    bench.add_argument("--model", help="the model folder, when TARGET is an artifact folder and other modes run")
    bench.add_argument("--image", help="image file (default: a 448x448 sample)")
    bench.add_argument("--prompt-tokens", type=int, default=32, help="length of the question in tokens")
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3, help="generations per mode, interleaved across modes (one "
                       "mode after another when their weights do not fit in memory together)")
    which = bench.add_mutually_exclusive_group()
    which.add_argument("--buckets", help="bucket spec YAML for the runtime's export (default: fitted to the workload)")
    which.add_argument("--preset", help="bucket preset for the runtime's export")
    bench.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    bench.add_argument("--workdir", help="where exports and inputs go (default: a temporary folder)")
    bench.add_argument("--json", help="write the report as JSON to this file")
    bench.add_argument("--plot", help="write a PNG plot to this file")
    bench.add_argument("--device", choices=("CPU", "Ascend"), default=None)

    plan = sub.add_parser("plan", help="choose the buckets from a workload sample, and show what each bucket costs")
    plan.add_argument("target", help="a Hugging Face Qwen2-VL folder, or an artifact folder (whose export times "
                                     "predict the plan's)")
    plan.add_argument("--workload", required=True,
                      help="a JSONL file of chat-completion request bodies or `mindvl serve --log-shapes` lines, or "
                           "a folder of images and videos")
    plan.add_argument("-o", "--output", required=True, help="the bucket spec YAML to write")
    plan.add_argument("--max-graphs", type=int, default=12, help="graphs the spec may have (default: 12)")
    plan.add_argument("--max-memory", type=float, help="GB the weights and every KV cache may take (default: any)")
    plan.add_argument("--floor", type=float, default=0.5,
                      help="the share of its native tokens every image must keep when the budget allows "
                           "(default: 0.5; README.md, Buckets, says why)")
    plan.add_argument("--against", help="a bucket spec YAML or preset name to score side by side")
    plan.add_argument("--batch", help="batch buckets, comma-separated (default: from the concurrency of a "
                                      "--log-shapes workload, else 1)")
    plan.add_argument("--prompt-tokens", help="for a folder: text tokens per request, e.g. 64 or 64:0.7,512:0.3")
    plan.add_argument("--max-tokens", type=int, default=256,
                      help="new tokens of a request that does not say (default: 256)")
    plan.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: the target's")
    plan.add_argument("--json", help="write the report as JSON to this file")
    plan.add_argument("--plot", help="draw the report to this PNG file")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (POST /v1/chat/completions) over "
                                         "exported artifacts")
    serve.add_argument("artifacts")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                           "only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--media-dir", help="folder whose files requests may name as images and videos")
    serve.add_argument("--max-concurrency", type=int, default=64,
                       help="requests in flight (queued or generating) before a 429 (default: 64)")
    serve.add_argument("--api-key", default=os.environ.get("MINDVL_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $MINDVL_API_KEY, else no key)")
    serve.add_argument("--allow-remote-media", action="store_true",
                       help="fetch http(s) image URLs, from public addresses only (default: refuse)")
    serve.add_argument("--allow-media-network", action="append", default=[], metavar="CIDR",
                       help="also fetch image URLs from this non-public network, e.g. 10.0.0.0/8; repeat for several")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="let web pages of this origin (scheme://host[:port]) call the server (CORS); repeat "
                            "for several (default: refuse requests that carry an Origin)")
    serve.add_argument("--max-images", type=int, default=16, help="images per request (default: 16)")
    serve.add_argument("--max-videos", type=int, default=2, help="videos per request (default: 2)")
    serve.add_argument("--max-parts", type=int, default=64,
                       help="content parts per request, over all its messages (default: 64)")
    serve.add_argument("--max-text-chars", type=int, default=None,
                       help="characters of text per request (default: 16 per slot of the largest KV cache)")
    serve.add_argument("--max-media-mb", type=float, default=100,
                       help="largest image or video file read from --media-dir (default: 100)")
    serve.add_argument("--prefix-cache-mb", type=float, default=1024,
                       help="KV cache memory kept so that requests starting the same way (the next turn of a chat) "
                            "prefill only the rest; 0 turns prefix reuse off (default: 1024)")
    serve.add_argument("--vision-cache-mb", type=float, default=256,
                       help="visual tokens kept so that an image sent again is not encoded again; 0 turns it off "
                            "(default: 256)")
    serve.add_argument("--stall-timeout", type=float, default=120,
                       help="seconds the worker may hold requests without completing a step before /health reports "
                            "it unhealthy (default: 120)")
    serve.add_argument("--log-shapes", metavar="FILE",
                       help="append one JSON line per chat completion with its shapes only (image sizes, video "
                            "frames, size and fps, token counts; never its content), for `mindvl plan`")
    serve.add_argument("--model-name", help="the model id clients send (default: the artifact folder's name)")
    serve.add_argument("--max-body-mb", type=float, default=20, help="largest request body (default: 20)")
    serve.add_argument("--request-timeout", type=float, default=30,
                       help="seconds a client may take to send a request's headers, then its body (default: 30)")
    serve.add_argument("--device", choices=("CPU", "Ascend"), default=None)
    serve.add_argument("--format", choices=("mindir", "onnx"),
                       help="which graphs to run when the artifact has both (default: mindir)")
    serve.add_argument("--provider", choices=("CPU", "CUDA"), default="CPU",
                       help="onnxruntime's execution provider for ONNX graphs (default: CPU)")
    return parser


def _bench(args: argparse.Namespace) -> None:
    from mindvl.bench.benchmark import format_table, plot, run_bench
    from mindvl.shapes.buckets import BucketSpec

    spec = (BucketSpec.from_yaml(args.buckets) if args.buckets
            else BucketSpec.preset(args.preset) if args.preset else None)
    report = run_bench(args.target, tuple(m.strip() for m in args.modes.split(",") if m.strip()), args.image,
                       args.prompt_tokens, args.new_tokens, spec, args.repeats, args.dtype, args.model, args.workdir,
                       args.device)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)


def _plan(args: argparse.Namespace) -> None:
    from mindvl.plan.command import run_plan
    from mindvl.plan.planner import PlanError
    from mindvl.plan.report import format_report, plot_report

    try:
        batch = tuple(int(b) for b in args.batch.split(",")) if args.batch else None
    except ValueError:
        raise PlanError(f"--batch {args.batch!r}: give batch sizes separated by commas, e.g. 1,4") from None
    report = run_plan(args.target, args.workload, args.output, max_graphs=args.max_graphs,
                      max_memory_gb=args.max_memory, floor=args.floor, against=args.against, batch=batch,
                      prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, dtype=args.dtype)
    print(format_report(report))
    print(f"\nwrote {args.output}: mindvl export MODEL_DIR -o ARTIFACTS --buckets {args.output}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_report(report, args.plot)


def _export(args: argparse.Namespace) -> None:
    from mindvl.export import export_artifacts
    from mindvl.shapes.buckets import BucketSpec

    spec = BucketSpec.from_yaml(args.buckets) if args.buckets else BucketSpec.preset(args.preset or "default")
    if args.tp is not None:
        spec = BucketSpec.from_dict({**spec.to_dict(), "tp": args.tp})
    export_artifacts(args.model_dir, args.output, spec, dtype=args.dtype, force=args.force,
                     formats=tuple(f.strip() for f in args.format.split(",") if f.strip()))


def _generate(args: argparse.Namespace) -> None:
    from mindvl.runtime import Output, Runtime

    rt = Runtime.load(args.artifacts, device=args.device, fmt=args.format, provider=args.provider)
    out = Output()
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed, output=out)
    stream_to = sys.stderr if args.json else sys.stdout
    for piece in rt.stream(args.prompt, images=args.image, videos=args.video, **sampling):
        if args.stream:
            print(piece, end="", file=stream_to, flush=True)
    if args.json:
        timings = {k: round(out.timings[k], 3) for k in ("vision", "prefill", "decode_per_token", "total")}
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "prompt_tokens": out.prompt_tokens,
                          "buckets": out.buckets, "timings_ms": timings,
                          "prompt_tokens_reused": out.prompt_tokens_reused,
                          "prompt_tokens_prefilled": out.prompt_tokens_prefilled,
                          "prefill_chunks": out.prefill_chunks, "vision_cache_hits": out.vision_cache_hits},
                         ensure_ascii=False))
    elif args.stream:
        print()
    else:
        print(out.text)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # MindSpore reads its log level when it is first imported: keep its INFO/WARNING noise out of the output.
    os.environ.setdefault("GLOG_v", "3")
    from mindvl.errors import MindVLError

    try:
        if args.command == "demo":
            from mindvl.apps.demo import run_demo

            run_demo(model_dir=args.model, prompt=args.prompt, images=args.image, videos=args.video,
                     preset=args.preset, cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens,
                     device=args.device)
        elif args.command == "export":
            _export(args)
        elif args.command == "inspect":
            from mindvl.runtime.inspection import inspect_artifacts

            print(inspect_artifacts(args.artifacts, verify=args.verify))
        elif args.command == "generate":
            _generate(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "plan":
            _plan(args)
        elif args.command == "serve":
            from mindvl.serve import serve

            serve(args.artifacts, host=args.host, port=args.port, media_dir=args.media_dir,
                  max_concurrency=args.max_concurrency, api_key=args.api_key,
                  allow_remote_media=args.allow_remote_media, model_name=args.model_name,
                  max_body_mb=args.max_body_mb, request_timeout=args.request_timeout, device=args.device,
                  allow_media_network=args.allow_media_network, allow_origin=args.allow_origin,
                  max_images=args.max_images, max_videos=args.max_videos, max_parts=args.max_parts,
                  max_text_chars=args.max_text_chars, max_media_mb=args.max_media_mb,
                  stall_timeout=args.stall_timeout, prefix_cache_mb=args.prefix_cache_mb,
                  vision_cache_mb=args.vision_cache_mb, log_shapes=args.log_shapes, fmt=args.format,
                  provider=args.provider)
        return 0
    except MindVLError as e:
        if args.debug:
            raise
        print(f"mindvl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mindvl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
