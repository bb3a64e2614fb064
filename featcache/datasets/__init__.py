"""featcache.datasets: reading ``--data`` (folders, manifests, dataset layouts, corpora) into a
``Dataset`` of ``Record``s."""
