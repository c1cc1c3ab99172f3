"""engine-embed-text: class names / prompts -> one prompt-embedding table file.

    engine-embed-text --classes brick,grass [--template "a photo of {}"] --out table.safetensors
    engine-embed-text --prompts PROMPTS.txt [--classes brick,grass] --out table.safetensors
                      [--encoder wordllama|clip:DIR]

One prompt per class (from --template, or line by line from --prompts), then the "" row for the
unconditional case. See engine/text.py for what is stored. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.commands import UsageError, run_command
from engine.text import (
    DEFAULT_TEMPLATE,
    ENCODER_SPECS,
    build_prompt_table,
    check_encoder_spec,
    load_text_encoder,
    write_prompt_table,
)

PROG = "engine-embed-text"


def class_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, got an empty one in {text!r}")
    return names


def encoder_argument(text: str) -> str:
    try:
        return check_encoder_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Embed one prompt per class (and the unconditional \"\") into a prompt table "
                               "for text-conditioned models.")
    parser.add_argument("--classes", type=class_list,
                        help="comma-separated class names, in the data's class order (e.g. brick,grass)")
    parser.add_argument("--prompts", help="text file with one prompt per class, one per line (blank lines "
                                          "skipped); without --classes the prompts are the class names too")
    parser.add_argument("--template", help=f"prompt of each class, {{}} = its name with _ read as a space "
                                           f"(default {DEFAULT_TEMPLATE!r}); not with --prompts")
    parser.add_argument("--encoder", type=encoder_argument, default="wordllama", help=f"{ENCODER_SPECS} (default wordllama)")
    parser.add_argument("--out", required=True, help="table file to write (.safetensors)")
    return parser


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of `path`, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts file not found: {path}; pass a text file with one prompt per line") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.classes is None and args.prompts is None:
            raise UsageError("give --classes NAME,NAME, --prompts FILE, or both")
        if args.prompts is not None and args.template is not None:
            raise UsageError("--template fills in class names; with --prompts the prompts are used as written")
        prompts = read_prompts(args.prompts) if args.prompts is not None else None
        class_names = args.classes if args.classes is not None else prompts
        table = build_prompt_table(class_names, load_text_encoder(args.encoder),
                                   DEFAULT_TEMPLATE if args.template is None else args.template, prompts)
        write_prompt_table(args.out, table)
        n, length, dim = table.shape
        print(f"wrote {args.out}: {table.num_prompts} class prompts + the unconditional \"\", context "
              f"[{n}, {length}, {dim}] float32, encoder {table.encoder}")

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
