"""`facedist report`: what a coefficients table is worth, measured.

  * image   the paper's protocol: k-fold split by image, C-Net vs the mean, coefficients vs images
  * person  people never seen in training: gallery -> probe identity, linear probes per descriptor
"""
