from pneumo_edge.cli import main

main()
