"""What the coordinator keeps on disk: the adapter registry, the encrypted vault and the emulator store."""
