"""tunelab.models.loading."""
