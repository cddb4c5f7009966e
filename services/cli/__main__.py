"""`python -m services.cli` / `drctl`: the operator command line.

Exit status: 0 done, 1 the service refused or failed (its message on stderr), 2 usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.cli.client import Api, ApiError, service_urls
from services.cli.commands import build_parser
from services.cli.context import Context, UsageError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("an API token is needed: pass --token TOKEN or set DR_TOKEN")
    ctx = Context(
        api=Api(service_urls(args.url), args.token),
        vault=args.vault,
        json=args.json,
        out=sys.stdout,
    )
    try:
        args.func(ctx, args)
    except UsageError as exc:
        parser.error(str(exc))
    except ApiError as exc:
        where = f" ({exc.status})" if exc.status else ""
        print(f"drctl: error{where}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
