"""Recipes, validation and launch of Kohaku XL Epsilon training over kohya-ss/sd-scripts."""
