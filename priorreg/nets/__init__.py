"""Convolutional networks of PriorReg (untrained deep-prior generators now; trained registration models later)."""
