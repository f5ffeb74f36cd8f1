"""Reference images: opening and decoding files, the reference latents / K/V cache, a batch's layout."""
