"""mkdocs hooks: the README is the site's home page, and the repository files the pages show (benchmark plots,
the demo's strip) are published beside them, so one set of Markdown reads right on GitHub and in the site."""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ["benchmarks/results"]  # repository folders whose images the pages link to (as ../benchmarks/…)


def on_files(files, config):
    readme = (ROOT / "README.md").read_text()
    readme = re.sub(r"\]\(docs/", "](", readme)  # README's links into docs/ are the site's own pages
    files.append(File.generated(config, "index.md", content=readme))
    for folder in PUBLISHED:
        for image in sorted((ROOT / folder).rglob("*.png")):
            files.append(File(str(image.relative_to(ROOT)), str(ROOT), config["site_dir"],
                              config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    # a page links a repository file as ../path (right on GitHub); the site publishes it at path
    return re.sub(r"\]\(\.\./(?=benchmarks/)", "](", markdown)
