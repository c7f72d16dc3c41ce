"""The cowfs benchmark suite: cowfs side by side with kernel overlayfs, fuse-overlayfs and native.

Modules: `dataset` builds the shared data, `systems` mounts each filesystem over it, `workloads`
defines what is timed, `runner` interleaves systems run by run, `report` writes the Markdown table,
the JSON file and the SVG chart. `cowfs bench` (cowfs/cli/bench.py) drives them.
"""
