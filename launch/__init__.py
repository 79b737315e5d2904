"""Cluster launches of megatron-nft with NeMo-Run.

A launch is a named recipe (recipes.py: what runs, on how many nodes) plus the user's cluster settings
(config.py: account, partition, container image, mounts), turned into NeMo-Run executors and tasks
(executors.py, tasks.py) and one run.Experiment (experiment.py), dry-run or submitted:

    python -m launch --list
    python -m launch local/demo job.gpus_per_node=2 --dryrun
    python -m launch paper/qwen2.5-math-7b-nft --cluster cluster.yaml --dryrun

Kept out of megatron_nft (the library) because it needs nemo-run, which training itself never does.
"""
