"""Accounts: API keys, authorization per model; credits and limits go through the store."""
