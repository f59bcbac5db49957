"""The workloads specbench knows by name, one folder each (workload.toml, README.md and any
prompts it ships). Not code: this file only makes the folder a package, because a wheel
installs it inside specbench as `specbench.workloads.shipped` (see setup.py), where
specbench.workloads reads it with importlib.resources."""
