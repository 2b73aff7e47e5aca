"""Sitewarden's Flower App: federated logistic regression in NumPy on each site's local CSV."""
