"""Engine integrations (each imports its engine; lmkv_mp itself never does)."""
