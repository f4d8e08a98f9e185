"""``python -m distillery.serve SETTINGS.yaml``: run the server from a file of :class:`ServeConfig`
settings (YAML or JSON), in the foreground; ``--port`` overrides the file's port."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml
from pydantic import ValidationError

from distillery.serve.app import serve
from distillery.serve.config import ServeConfig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m distillery.serve", description=__doc__.split("\n")[0])
    ap.add_argument("settings", type=Path)
    ap.add_argument("--port", type=int)
    args = ap.parse_args(argv)
    raw = yaml.safe_load(args.settings.read_text("utf-8")) or {}
    if args.port is not None:
        raw["port"] = args.port
    try:
        config = ServeConfig(**raw)
    except ValidationError as e:
        raise SystemExit(f"{args.settings}: " + "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(config)


if __name__ == "__main__":
    main()
