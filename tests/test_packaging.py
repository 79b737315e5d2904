"""An installation without the checkout (the image's `pip install /opt/megatron-nft`) has every recipe:
`megatron-nft demo` there failed with "recipes/demo.yaml: no such file" before the recipes were data
files of the wheel (found by running the demo in an image built by scripts/build-image-here)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_every_recipe(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("megatron_nft-*.whl"))
    prefix = "share/megatron-nft/recipes/"
    shipped = {n.split(prefix, 1)[1] for n in zipfile.ZipFile(wheel).namelist() if prefix in n}
    in_checkout = {str(p.relative_to(ROOT / "recipes")) for p in (ROOT / "recipes").rglob("*.yaml")}
    assert shipped == in_checkout


def test_the_cli_reads_installed_recipes_without_a_checkout(tmp_path, monkeypatch):
    from megatron_nft import cli

    installed = tmp_path / "share" / "megatron-nft" / "recipes"
    installed.mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "megatron_nft" / "cli.py"))
    assert cli._recipes_dir() == installed
    monkeypatch.setattr(cli, "__file__", str(ROOT / "megatron_nft" / "cli.py"))
    assert cli._recipes_dir() == ROOT / "recipes"
