"""MkDocs hooks for fedzip's site: pages generated from the code, and links into the rest of the repository.

- ``<!-- fedzip:config-reference -->`` becomes the table of every configuration key, from the schema
  (``fedzip.config.describe_fields``); ``<!-- fedzip:cli-reference -->`` every command's ``--help``.
- A page may link to a file of the repository outside ``docs/`` (a benchmark page, the README) by its relative
  path, which works when reading the sources. The built site sits in ``site/`` at the repository's root, so the
  link is rewritten to reach the same file from the page's URL. Every relative link, inside ``docs/`` or not, must
  name a file that exists, or the build fails (MkDocs itself then checks anchors; it cannot tell a rewritten link
  from a broken one, so mkdocs.yml leaves existence to this hook).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")
FENCE = re.compile(r"(^```.*?^```)", re.S | re.M)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- fedzip:config-reference -->" in markdown:
        markdown = markdown.replace("<!-- fedzip:config-reference -->", config_table())
    if "<!-- fedzip:cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- fedzip:cli-reference -->", cli_help())
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    source = Path(page.file.abs_src_path).resolve().parent
    depth = len([p for p in page.url.split("/") if p])  # the page's folder below the site's root
    to_repo = "../" * (depth + 1)  # site/ is at the repository's root

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return match.group(0)  # a URL, or an absolute path: not ours to check
        path = (source / target).resolve()
        if not path.exists() or not path.is_relative_to(repo):
            raise PluginError(f"{page.file.src_path}: link to {target} points at nothing in the repository")
        if path.is_relative_to(docs):
            return match.group(0)  # a page of the site: MkDocs maps it to its URL
        return f"{match.group(1)}{to_repo}{path.relative_to(repo).as_posix()}{match.group(3) or ''}{match.group(4)}"

    parts = FENCE.split(markdown)  # code blocks stay as they are
    return "".join(part if part.startswith("```") else LINK.sub(rewrite, part) for part in parts)


def config_table() -> str:
    from fedzip.config import describe_fields

    def cell(text: str) -> str:  # a table cell: no pipes, no line breaks, and <placeholders> shown, not parsed
        return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{r['key']}` | {cell(r['type'])} | `{cell(r['default'])}` | {cell(r['description'])} |"
             for r in describe_fields()]
    return "\n".join(rows)


def cli_help() -> str:
    import argparse

    from fedzip.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the page should not depend on it
    out = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        out.extend([f"## `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""])
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")

    walk(build_parser(), "fedzip")
    return "\n".join(out)
