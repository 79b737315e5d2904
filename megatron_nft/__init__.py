"""megatron-nft: Negative-aware Fine-Tuning (NFT) and its baselines on Megatron-core actors."""

__version__ = "0.1.0"
