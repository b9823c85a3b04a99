"""`plr export`: a finished run as a PEFT LoRA adapter, with its masks and a model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from partial_lora.commands import Parser
from partial_lora.errors import one_line_errors


def export_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="plr export", description="Write a finished plr run (retrain stage done) as a LoRA "
                     "adapter in PEFT's format (adapter_config.json, adapter_model.safetensors) that "
                     "peft.PeftModel.from_pretrained loads, plus plr_masks.safetensors, plr_layers.json, "
                     "plr_config.yaml and a model card (README.md).")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run dir of a finished `plr train` run")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the export folder (absent or empty)")
    parser.add_argument("--merged", action="store_true",
                        help="also write OUT_DIR/merged/: the base with the adapter merged in (+ tokenizer or "
                             "image processor when the model has one)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in OUT_DIR (never other files)")
    return parser


@one_line_errors()
def export_command(argv: list[str]) -> int:
    from partial_lora.export import export_run

    args = export_parser().parse_args(argv)
    exported = export_run(args.run_dir, args.out_dir, merged=args.merged, force=args.force)
    print(exported.summary())
    return 0
