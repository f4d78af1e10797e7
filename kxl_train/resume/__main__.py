from kxl_train.resume.launcher import main

main()
