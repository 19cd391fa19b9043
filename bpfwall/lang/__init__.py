"""The filter language: lexer, parser, AST, type checker, reference evaluator."""
