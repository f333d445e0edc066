"""agegender: Levi-Hassner age-group and gender CNNs on Adience, honest 5-fold CV."""
