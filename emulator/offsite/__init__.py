"""The Offsite-Tuning emulator itself: compression of the middle, distillation, and the cloud's corpus."""
