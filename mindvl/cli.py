"""The `mindvl` command line: argparse at the edge, typed functions underneath."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindvl", description="Qwen2-VL as graph-mode MindSpore at static shapes.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="image and video prompts in graph mode vs pynative (default: a tiny random model)")
    demo.add_argument("--model", help="a Hugging Face Qwen2-VL folder (default: a tiny random one, made locally)")
    demo.add_argument("-p", "--prompt", help="the user's text (default: the demo's own image and video prompts)")
    demo.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    demo.add_argument("--video", action="append", default=[], help="a video file; repeat for several")
    demo.add_argument("--cache-dir", help="where the tiny model is written (default: the user cache folder)")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--device", choices=("CPU", "Ascend"), default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # MindSpore reads its log level when it is first imported: keep its INFO/WARNING noise out of the output.
    os.environ.setdefault("GLOG_v", "3")
    from mindvl.errors import MindVLError

    try:
        if args.command == "demo":
            from mindvl.demo import run_demo

            run_demo(model_dir=args.model, prompt=args.prompt, images=args.image, videos=args.video,
                     cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens, device=args.device)
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
