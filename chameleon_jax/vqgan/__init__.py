"""vqgan"""
