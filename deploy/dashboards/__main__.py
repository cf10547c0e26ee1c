"""Write the dashboards to deploy/grafana, or with `--check` fail if the files there differ from the code.

    python -m deploy.dashboards            # regenerate deploy/grafana/*.json
    python -m deploy.dashboards --check    # exit 1, naming the files, if any is stale or missing
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from deploy.dashboards.catalog import DASHBOARDS

OUT = pathlib.Path(__file__).resolve().parents[1] / "grafana"


def render() -> dict[str, str]:
    """`{file name: JSON text}` of every dashboard, as committed."""
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


def stale(out: pathlib.Path, rendered: dict[str, str]) -> list[str]:
    """Files of `out` that differ from `rendered` or are missing, and JSON files no dashboard writes."""
    differ = [name for name, text in rendered.items()
              if not (out / name).is_file() or (out / name).read_text() != text]
    extra = [path.name for path in sorted(out.glob("*.json")) if path.name not in rendered]
    return differ + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.dashboards", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help="dashboard folder (default: deploy/grafana)")
    args = parser.parse_args(argv)
    rendered = render()
    if args.check:
        bad = stale(args.out, rendered)
        if bad:
            print(f"stale dashboards in {args.out}: {', '.join(bad)}; run python -m deploy.dashboards", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (args.out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
