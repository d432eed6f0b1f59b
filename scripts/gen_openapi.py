"""Write aegis_edge_relay/http/openapi.json from the API's route table; --check: fail if stale."""

from __future__ import annotations

import sys
from pathlib import Path

from aegis_edge_relay.http.openapi import build_document, render

TARGET = Path(__file__).resolve().parents[1] / "aegis_edge_relay" / "http" / "openapi.json"


def main(argv: list[str]) -> int:
    text = render(build_document())
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python scripts/gen_openapi.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
