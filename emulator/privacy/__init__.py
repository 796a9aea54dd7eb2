"""Defences on what the edge transmits (noise, NoPeek), shared by the edge and the owner's audit."""
