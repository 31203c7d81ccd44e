"""Retrieval evaluation on shelf crops: metrics, the challenger/champion/base comparison, reports and plots."""
