"""``--root URL`` and ``--storage-option KEY=VALUE``: how every engine job names its output root."""

from __future__ import annotations

import argparse
from typing import Any

import fsspec

from pipeline.layout import Layout


def add_root_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add ``--root`` (a local path or any fsspec URL) and the repeatable ``--storage-option``."""
    parser.add_argument("--root", required=required, help="output root: a local path or an fsspec URL")
    parser.add_argument(
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE",
        help="fsspec option for the root, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)",
    )  # fmt: skip


def parse_options(parser: argparse.ArgumentParser, items: list[str], flag: str = "--storage-option") -> dict:
    """``KEY=VALUE`` items as a dict of fsspec options (a bad item exits with status 2)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"{flag} {item!r} is not KEY=VALUE")
        options[key] = value
    return options


def layout_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Layout:
    """The ``Layout`` of ``--root`` with its ``--storage-option`` values (a bad item exits with status 2)."""
    return Layout(args.root, **parse_options(parser, args.storage_options))


def options_for(url: str, layout: Layout, given: dict[str, Any]) -> dict[str, Any]:
    """fsspec options for another URL a job reads (a teacher, a truth file): none for a local path; else
    ``given`` (its own flag) when any, else the root's when ``url`` is on the root's protocol (one store, one
    set of credentials)."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    if protocol in ("file", "local"):
        return {}
    if given:
        return given
    return dict(layout.storage_options) if protocol == fsspec.core.split_protocol(layout.url)[0] else {}
