"""Reports: W&B run logging (the HTML and W&B cost reports come with the ledger and sweeps)."""
