"""The embedded demo: a small BatchNorm CNN on scikit-learn's bundled digits (``dnnshrink demo``)."""
