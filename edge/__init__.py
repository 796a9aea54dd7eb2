"""The data owner's client: training modes, the training loop and the channel to the coordinator."""
