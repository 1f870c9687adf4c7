"""rlrf: Reinforcement Learning from Recsys Feedback for LLM user profiles."""
__version__ = "0.1.0"
