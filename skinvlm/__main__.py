from skinvlm.cli import main

main()
