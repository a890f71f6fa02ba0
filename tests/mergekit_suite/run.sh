#!/usr/bin/env bash
# Run mergekit's own test suite (from the sdist of the installed version) with this plugin
# installed and its start-up hook active: no other merge method may change behaviour.
#   bash tests/mergekit_suite/run.sh [pytest args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
version="$("$python" -c 'import importlib.metadata as m; print(m.version("mergekit"))')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: "mergekit==$version" -d "$work"
tar -xzf "$work"/mergekit-"$version".tar.gz -C "$work"
src="$work/mergekit-$version"
rm -rf "$src/mergekit"            # test the installed mergekit, not the sdist's copy
cp "$here/common.py" "$src/tests/common.py"
cd "$src"
"$python" - <<'PY'
import sys
assert getattr(sys, "_mergekit_metagpt_hook_installed", False), "mergekit-metagpt's start-up hook is not active"
import mergekit.merge_methods as m
assert m.get("metagpt").spec.name == "metagpt", "metagpt is not registered"
print("mergekit-metagpt hook active: metagpt registered next to",
      len(m.registered_methods()) - sum(n.startswith("metagpt") for n in (x.spec.name for x in m.registered_methods())), "stock methods")
PY
"$python" -m pytest -q -p no:cacheprovider tests "$@"
