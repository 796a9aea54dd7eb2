"""The cloud's frozen middle behind one seam: the in-process runner and dlora's call-outs."""
