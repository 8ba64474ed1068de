"""Drop-in front ends that let code written for other libraries run on fastdiff's samplers.

Integrations are imported explicitly (``from fastdiff.integrations import k_diffusion``), so
``import fastdiff`` never pulls in what they adapt to.
"""
