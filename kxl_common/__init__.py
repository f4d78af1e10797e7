"""Small pieces shared by kxl_prep, kxl_train and kxl_tools."""
