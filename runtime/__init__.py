"""pagedserve runtime."""
