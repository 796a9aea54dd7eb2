"""The model side both roles share: surgery, adapters and the PEFT format, data and scoring, the emulator."""
