"""Sarathi operator: reconciles SarathiDeployment resources and tunes their token budget."""
