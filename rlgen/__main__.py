from rlgen.cli.app import main

main()
