"""The patient's identity inside the image: keys, the sealed payload, instances that carry it."""
