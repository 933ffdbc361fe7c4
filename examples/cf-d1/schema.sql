DROP TABLE IF EXISTS qtable;
CREATE TABLE qtable (id INTEGER PRIMARY KEY, quote TEXT, author TEXT);
INSERT INTO qtable (quote, author) VALUES ('Talk is cheap. Show me the code.', 'Linus Torvalds');
