"""Stage `register`: register a generator in MLflow and gate the `champion` alias on FID.

    python -m pipelines.register --family gan|ldm [--require-promotion]

The registry and the gate are pipelines.registry. The decision is printed in one line and written to
<registry.out_dir>/<family>.json. --require-promotion exits 1 when the version is not (already) the champion.
"""

from __future__ import annotations

from pipelines.common import family_parser, run_stage
from pipelines.registry import register


def main() -> None:
    parser = family_parser("genforge register stage: MLflow model version + FID gate", "register")
    parser.add_argument("--require-promotion", action="store_true", help="exit 1 if the version does not become champion")
    run_stage("register", lambda cfg, args: register(cfg, args.family, args.require_promotion).get("exit_code", 0), parser)


if __name__ == "__main__":
    main()
