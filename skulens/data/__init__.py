"""From pulled files to training data: image decoding, cleaning, data-quality checks, Great Expectations, class
balancing, the on-disk dataset layout, training bundles and DVC."""
