"""``raysseg weights list`` and ``raysseg weights fetch NAME [--to URI]`` (:mod:`raysseg.io.weights`)."""
from __future__ import annotations


def _entry(name: str):
    from raysseg.io.weights import WeightsError, close_names, lookup

    entry = lookup(name)
    if entry is None:
        close = close_names(name)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise WeightsError(f"weights {name!r}: not a weights name; {hint}`raysseg weights list` shows them all")
    return entry


def cmd_list(args) -> None:
    from raysseg.io.weights import WEIGHTS, cache_dir, cached_state, source_url

    rows = [("name", "backbone", "published checksum", "cache", "url")]
    rows += [(w.name, w.backbone, w.published or "none (TOFU)", cached_state(w), source_url(w))
             for w in WEIGHTS.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"cache: {cache_dir()} (RAYSSEG_CACHE)")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])


def cmd_fetch(args) -> None:
    from raysseg.io.weights import cached_state, fetch, upload

    entry = _entry(args.name)
    if args.to:
        uri = upload(entry, args.to)
        print(f"{entry.name}: {uri} ({cached_state(entry)})")
        print(f"use it with: --set model.weights={uri} (or keep the name and set "
              f"RAYSSEG_WEIGHTS_URL={args.to.rstrip('/')} where the cache is filled)")
        return
    path = fetch(entry)
    print(f"{entry.name}: {path} ({cached_state(entry)})")


def add_commands(sub) -> None:
    """The ``weights`` command group on the CLI's subparsers."""
    weights = sub.add_parser("weights", help="named pretrained backbones (model.weights: NAME): list, fetch")
    group = weights.add_subparsers(dest="weights_command", required=True)
    group.add_parser("list", help="the names, their backbones, published checksums and what the cache holds "
                                  "(TOFU: no published checksum, recorded on first use)").set_defaults(fn=cmd_list)
    sp = group.add_parser("fetch", help="download NAME into the cache (RAYSSEG_CACHE, default torch.hub's), "
                                        "checked; --to also copies it to a bucket or folder")
    sp.add_argument("name", help="a name of `raysseg weights list`, e.g. dino_vits8")
    sp.add_argument("--to", metavar="URI", help="s3://bucket/prefix (or a folder) to copy the file into, for "
                                                "nodes without network: model.weights=<URI>/<file>")
    sp.set_defaults(fn=cmd_fetch)
